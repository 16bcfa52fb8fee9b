"""Data preparation: MTG-Jamendo metadata, a synthetic MTG-Jamendo, spectrogram features, TFRecord shards."""
