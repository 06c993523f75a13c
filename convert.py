"""Convert a Hugging Face Gemma 4 unified checkpoint to MLX: see `python convert.py --help`."""

from mlx_gemma.convert import main

if __name__ == "__main__":
    main()
