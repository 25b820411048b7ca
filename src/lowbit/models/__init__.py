"""Finding, building and loading models: HF directories, lowbit directories, ``builtin:`` models."""
