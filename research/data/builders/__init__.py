"""Our tfds builders for local files; importing this package registers them with tfds."""

from research.data.builders.text_classification import LocalTextClassification

# tfds builder name -> class, for data_cfg.tfds_name = "<name>/<config>".
BUILDERS = {cls.name: cls for cls in (LocalTextClassification,)}

__all__ = ["BUILDERS", "LocalTextClassification"]
