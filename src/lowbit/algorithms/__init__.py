"""Quantization algorithms: pure functions choosing values (RTN, GPTQ, AWQ, …) and the calibration runner."""
