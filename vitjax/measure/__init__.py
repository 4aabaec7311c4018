"""Measuring speed so that figures can be trusted and compared: the machine a
figure ran on (machine.py), interleaved timing with per-round ratios
(timing.py), and where a compiled program's time goes (profiling.py)."""
