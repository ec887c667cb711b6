"""`python -m monai_trt <command>`: see :mod:`monai_trt.cli.main`."""

from monai_trt.cli.main import main

if __name__ == "__main__":
    main()
