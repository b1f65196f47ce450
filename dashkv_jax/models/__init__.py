"""Model families and what loads them: configs, the decoders, GGUF and Hugging Face loaders,
tokenizers. Imports nothing from the other folders of the package."""
