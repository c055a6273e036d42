"""Jobs that `transfusion train` runs besides the digits demo, and their commands.

    image_text.py   train on prepared image-caption folders (and text-only rows)
    image_text_config.py  its keys, read from TOML and the command line, and what a rerun may change
    language_model.py  such a run started from a pretrained causal LM: its tokenizer and fingerprint checked
    sampling.py     drawing and captioning with such a run
    run_commands.py `transfusion sample / caption / eval` on such a run
    pictures.py     sample grids as PNG files
    commands.py     `transfusion prepare / shapes / caption` and the train dispatch, for cli.py

The command line's shared parts (its error type, option helpers) are in `cli_options.py`, below
both `cli.py` and this package: nothing here imports `cli.py`.
"""
