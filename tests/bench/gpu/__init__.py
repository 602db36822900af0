"""`make bench-gpu`: pofa's training step, KD kernel, masks and 2:4 kernels timed on one GPU.

Each measurement is a function of a device and a shape (`shapes.Shape`), so the test tier runs the
same code at a tiny shape on the CPU (tests/bench/test_bench_gpu.py). The entry point is
tests/bench/bench_gpu.py.
"""
