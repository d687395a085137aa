"""What "evaluate" and "calibrate" mean for each kind of model (tasks), and the measurements themselves."""
