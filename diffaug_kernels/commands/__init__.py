"""The commands of `python -m diffaug_kernels <command>`, one module each (NAME, HELP, DESCRIPTION,
add_arguments(parser), main(args)); cli.py assembles them."""
