"""The factory side: a Flower ClientApp that trains standard models with DP-SGD."""
