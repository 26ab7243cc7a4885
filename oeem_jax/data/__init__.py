"""Data layer: GlaS source folder checks and decoding (`source`), validation carve-out (`splits`), the
TFDS builder and its cache (`glas`), the stages' in-memory loader (`loader`), embedded synthetic set
(`synthetic`), tile grid and patch labels (`tiles`), tf.data input pipelines (`pipeline`). All arrays NHWC."""
