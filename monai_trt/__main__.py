"""`python -m monai_trt <command>`: see :mod:`monai_trt.cli.commands`."""

from monai_trt.cli.commands import main

if __name__ == "__main__":
    main()
