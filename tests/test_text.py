import pytest

from echoic.data.text import drop_spaces_between_cjk, normalize_text


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Hello, World!", "hello world"),
        ("It's 50% off -- the 21st time.", "it's fifty percent off the twenty first time"),
        (
            "Mr. Smith paid $3.50 & left in 1984",
            "mister smith paid three dollars fifty cents and left in nineteen eighty four",
        ),
        ("He owns 1,000,000 sheep", "he owns one million sheep"),
        ("'Quoted' words, James' hat", "quoted words james hat"),
        ("ＦＵＬＬ－width", "full width"),
        ("  many   spaces\there ", "many spaces here"),
    ],
)
def test_english(raw, expected):
    assert normalize_text(raw, "en") == expected


def test_chinese_numbers_punctuation_and_spaces():
    assert normalize_text("今天 是 2024年，温度25度。", "zh") == "今天是二零二四年温度二十五度"
    assert normalize_text("我用 Linux 系统", "zh") == "我用 linux 系统"


def test_cjk_spacing():
    assert drop_spaces_between_cjk("你好 世界 hello 世界") == "你好世界 hello 世界"
