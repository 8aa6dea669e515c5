"""How close a run is to the hardware and where its time and memory go, one job a module:

- ``peak``: the device's peak TFLOP/s (datasheet, or a measured matmul cached per machine);
- ``throughput``: samples/s, tokens/s, achieved TFLOP/s and MFU of a log row;
- ``memory``: the process's CUDA and resident-set peaks;
- ``flops_profile``: the headline figures of one profiled step (``flops_profile.txt``);
- ``trace``: a torch.profiler Chrome trace of a window of steps.
"""
