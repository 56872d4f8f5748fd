"""Our thin layer over albumentations: the transforms params may name, and policies built from them."""
