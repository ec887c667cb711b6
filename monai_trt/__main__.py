"""`python -m monai_trt <command>`: see :mod:`monai_trt.cli`."""

from monai_trt.cli import main

if __name__ == "__main__":
    main()
