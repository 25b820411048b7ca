"""GGUF (llama.cpp's file format): block quantization, tokenizer metadata, writer and validated reader.

The container is written with the ``gguf`` package's GGUFWriter; the block math (quants.py) and the
reader (reader.py) are lowbit's own, vectorised in torch and checked against ``gguf.quants``.
"""
