"""Reading and writing checkpoints: safetensors + config.json with a versioned quantization_config."""
