"""Data layer: GlaS TFDS builder and loader (`glas`), embedded synthetic set (`synthetic`), tile grid
and patch labels (`tiles`), tf.data input pipelines (`pipeline`). All arrays NHWC."""
