"""Training on your own data: sources -> prepare -> shards with a manifest -> a streaming loader.

    sources.py     imagefolder, datasets (save_to_disk, parquet), webdataset tars, text corpora
    images.py      decoding, resize and centre crop, aspect-ratio buckets
    codecs.py      pixels <-> latents: fixed patches, or a diffusers autoencoder (VAE)
    tokenizers.py  UTF-8 bytes, or a local Hugging Face tokenizer
    prepare.py     `transfusion prepare`: encode once, write shards (resumable, deterministic)
    shards.py      the safetensors shards and the JSON manifest
    loader.py      the streaming, resumable token-budget loader the trainer takes
    shapes.py      the walk-through set of captioned drawings and its checker

The model never sees a file and the trainer never sees a format: the loader hands the trainer
samples in the contract's list form. Nothing here is imported by `transfusion_pytorch`
itself; the heavy libraries (Pillow, diffusers, transformers, datasets, webdataset) are
imported where they are used, so each is needed only for the inputs that use it
(`pip install transfusion-pytorch[data]`).
"""
