"""Self-supervised pretraining commands that sit above decoding: `echoic kmeans`
(echoic.pretrain.units) labels frames with clusters of MFCC or a trained model's
hidden states, and may align them with a CTC model's characters to report how they
agree."""
