"""Jobs that `transfusion train` runs besides the digits demo, and their commands.

    image_text.py   train on prepared image-caption folders (and text-only rows)
    language_model.py  such a run started from a pretrained causal LM: its tokenizer and fingerprint checked
    sampling.py     drawing, captioning and the walk-through figures of such a run
    pictures.py     sample grids as PNG files
    commands.py     `transfusion prepare / shapes / caption` and the train dispatch, for cli.py
"""
