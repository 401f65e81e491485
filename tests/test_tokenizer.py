import pickle

import pytest

from echoic.data.tokenizer import BLANK, SOS_EOS, UNK, BpeTokenizer, CharTokenizer, load_tokenizer
from echoic.errors import EchoicError

EN = ["the quick brown fox", "jumps over the lazy dog", "don't panic it's fine"]
ZH = ["今天天气很好", "我们去公园 散步", "你好世界"]


def test_char_english_round_trip_and_layout(tmp_path):
    tok = CharTokenizer.train(EN)
    assert tok.tokens[0] == BLANK and tok.tokens[1] == UNK and tok.tokens[-1] == SOS_EOS
    assert tok.sos_eos_id == tok.vocab_size - 1 and "▁" in tok.tokens
    for text in EN:
        ids = tok.encode(text)
        assert tok.blank_id not in ids and tok.unk_id not in ids
        assert tok.decode(ids) == text
    tok.save(tmp_path / "t.json")
    assert load_tokenizer(tmp_path / "t.json").tokens == tok.tokens


def test_char_chinese_one_token_per_character():
    tok = CharTokenizer.train(ZH)
    assert "▁" not in tok.tokens  # spaces between Han characters are dropped
    assert len(tok.encode("今天天气很好")) == 6
    assert tok.decode(tok.encode("我们去公园 散步")) == "我们去公园散步"
    mixed = CharTokenizer.train(["我用 linux 系统"])
    assert mixed.decode(mixed.encode("我用 linux 系统")) == "我用 linux 系统"


def test_unknown_characters_map_to_unk_and_are_reported():
    tok = CharTokenizer.train(EN)
    ids = tok.encode("the café ñ")
    assert ids.count(tok.unk_id) == 2
    assert tok.unknown_chars("the café ñ") == ["é", "ñ"]
    assert len(ids) == len("the café ñ")  # nothing dropped


@pytest.mark.parametrize("texts", [EN * 20, ZH * 20])
def test_bpe_round_trip_save_load_and_pickle(tmp_path, texts):
    tok = BpeTokenizer.train(texts, vocab_size=40)
    assert tok.tokens[0] == BLANK and tok.tokens[1] == UNK and tok.tokens[-1] == SOS_EOS
    assert tok.vocab_size <= 40
    for text in set(texts):
        assert tok.decode(tok.encode(text)) == text.replace("园 散", "园散")
    tok.save(tmp_path / "bpe.json")
    loaded = load_tokenizer(tmp_path / "bpe.json")
    assert loaded.encode(texts[0]) == tok.encode(texts[0])
    copy = pickle.loads(pickle.dumps(tok))
    assert copy.encode(texts[1]) == tok.encode(texts[1])


def test_bpe_unknown_characters():
    tok = BpeTokenizer.train(EN * 20, vocab_size=40)
    text = "the fox é"
    assert tok.unknown_chars(text) == ["é"]
    assert tok.encode(text).count(tok.unk_id) == 1
    assert "<unk>" in tok.decode(tok.encode(text))


def test_too_small_bpe_vocabulary_is_a_clear_error():
    with pytest.raises(EchoicError, match="--vocab-size 10 is too small for the 28 characters"):
        BpeTokenizer.train(EN, vocab_size=10)


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(EchoicError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text('{"type": "word"}')
    with pytest.raises(EchoicError, match="unknown tokenizer type 'word'"):
        load_tokenizer(tmp_path / "x.json")
    (tmp_path / "y.json").write_text('{"type": "char", "tokens": ["a", "b"]}')
    with pytest.raises(EchoicError, match="not a tokenizer file"):
        load_tokenizer(tmp_path / "y.json")
