"""Whole-bundle work without data, shared by the CLI and the benchmark: read a bundle's configs, network and input
spec (:mod:`.load`); build and verify its engines ahead of time (:mod:`.build`); convert a model-zoo TensorRT config
into a monai_trt patch (:mod:`.zoo`)."""
