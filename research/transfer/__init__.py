"""HF checkpoint import/export, parameter paths, grafting and parameter-efficient transfer."""
