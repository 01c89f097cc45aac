"""Any timm model by name (timm:resnet18 ...), split into extractor and head through timm's API."""
