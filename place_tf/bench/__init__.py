"""Benchmarks of PLACE-TF (library of tools/benchmark.py): the training step (train.py,
run in a fresh process per configuration by train_worker.py), the input pipeline
(input.py), serving (serve.py), profiles (profile.py); machine facts and matmul peaks
(machine.py); the JSON result documents (results.py); the worker-process protocol
(workers.py). Importing a module here does not import TensorFlow.
"""
