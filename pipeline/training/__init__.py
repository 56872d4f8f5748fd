"""Learning: backbones, the compact CNN, the training loop, the linear probe and the strategies that use them."""
