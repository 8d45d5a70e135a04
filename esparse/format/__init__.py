"""The folder formats that the writer (converter/) and the readers (python_api/, ft_plugin/) share, and the
model-family descriptions they are named from. Depends on nothing else of esparse but its error type.

* ``families``  what esparse knows of each decoder family (LLaMA, OPT)
* ``ft_format`` the FasterTransformer folder: config.ini, tensor names and shapes, file sizes, checksums
* ``nm_pack``   the compressed N:M layout (values + packed in-group positions)
* ``ft_loader`` reading an FT folder back (validated, tensor-parallel shards merged)
* ``pruned``    the pruned HF folder: esparse.json and the permutations file
* ``tokenizer`` which tokenizer files a folder carries, copied and read safely
"""
