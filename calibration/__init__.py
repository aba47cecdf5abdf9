"""INT8 / FP16 conversion of exported CIGN graphs and confidence calibration (torch-free)."""
