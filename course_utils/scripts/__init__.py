"""Scripts launched with torchrun, one per chapter that needs a real multi-process run."""
