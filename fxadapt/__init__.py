"""fxadapt: adapters for Hugging Face models, compiled into the graph."""
