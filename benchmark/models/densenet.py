"""CIFAR DenseNet-BC (depth as a parameter) for the architecture study."""
