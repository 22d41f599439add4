"""PLACE pre-training: set-up (setup.py), the step (step.py), the loop and its guards
(loop.py, guards.py, logger.py), checkpoints (checkpoints.py), the run directory
(run_dir.py), the input stream (inputs.py) and the learning-rate schedule (schedule.py).

`loop.Trainer(cfg).run()` is the library entry point; `python -m place_tf.train` its CLI.
The package imports nothing itself: checkpoints and run_dir are read by the model
factory and the evaluation without pulling in the training loop.
"""
