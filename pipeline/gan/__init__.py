"""The per-fold class-conditional GAN, its samples, and how their quality is judged."""
