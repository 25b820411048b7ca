"""Kernels computing y = x·Wᵀ (+ b) for a QuantizedWeight; chosen by (format, device) in dispatch.py."""
