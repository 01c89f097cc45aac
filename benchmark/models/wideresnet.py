"""WideResNet-28 (widen factor as a parameter) for the architecture study."""
