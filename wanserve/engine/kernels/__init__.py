"""GPU kernels: our Triton one (imported only where Triton is installed) and cuDNN's FP8 attention (its module imports
anywhere; the `cudnn` package only when a GPU runs it). Each has a float32 reference in `wanserve.engine.fp8`."""
