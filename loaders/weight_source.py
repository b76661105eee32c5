"""A set of safetensors files seen as one name -> tensor table (diffusers shards or one file)."""
from __future__ import annotations

import glob
import json
import os

import torch

from .errors import ZImageError
from .safetensors_file import SafetensorsFile


class WeightSource:
    def __init__(self, files: list[str], role: str, where: str | None = None):
        self.role = role
        self.where = where or (files[0] if len(files) == 1 else os.path.dirname(files[0]))
        self.files: list[SafetensorsFile] = []
        self._owner: dict[str, SafetensorsFile] = {}
        try:
            for path in files:
                f = SafetensorsFile(path, role)
                self.files.append(f)
                for k in f.tensors:
                    self._owner[k] = f
        except BaseException:
            self.close()
            raise

    @classmethod
    def open(cls, path: str, role: str) -> "WeightSource":
        """A single file, or every .safetensors shard of a diffusers component folder."""
        if os.path.isdir(path):
            index = glob.glob(os.path.join(path, "*.safetensors.index.json"))
            if index:
                with open(index[0]) as f:
                    names = sorted(set(json.load(f)["weight_map"].values()))
                files = [os.path.join(path, n) for n in names]
                missing = [p for p in files if not os.path.exists(p)]
                if missing:
                    raise ZImageError(f"a shard of the {role} is missing", where=missing[0],
                                      expected=f"the {len(files)} shards listed in {os.path.basename(index[0])}",
                                      found=f"{len(missing)} missing", fix="download the whole folder again.")
            else:
                files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
            if not files:
                raise ZImageError(f"no .safetensors weights for the {role}", where=path,
                                  expected="diffusion_pytorch_model*.safetensors or model*.safetensors",
                                  found="none", fix="download the model's safetensors weights into this folder.")
            return cls(files, role, where=path)
        return cls([path], role)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: f.tensors[k].shape for k, f in self._owner.items()}

    def shapes_of(self, key: str) -> tuple[int, ...]:
        return self._owner[key].tensors[key].shape

    def keys(self) -> list[str]:
        return list(self._owner)

    def __contains__(self, key: str) -> bool:
        return key in self._owner

    def dtype(self, key: str) -> torch.dtype:
        return self._owner[key].tensors[key].dtype

    def get(self, key: str) -> torch.Tensor:
        return self._owner[key].get(key)

    def close(self) -> None:
        for f in self.files:
            f.close()
        self.files.clear()
        self._owner.clear()
