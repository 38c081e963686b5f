"""Reference models: plain Keras 3 Functional models that classify with logits.

ResNet-18/50, MobileNetV2, a small ViT and the digits models, usable with or
without `fliqs_keras.apply`; and the searchable MobileNetV2 space of the joint
architecture and format search.
"""

from fliqs_keras.models.digits import digits_mobilenet, digits_resnet, small_cnn
from fliqs_keras.models.mobilenet_v2 import mobilenet_v2
from fliqs_keras.models.mobilenet_v2_space import searchable_mobilenet_v2
from fliqs_keras.models.resnet import resnet18, resnet50
from fliqs_keras.models.vit import ClassTokenAndPosition, vit

__all__ = ["ClassTokenAndPosition", "digits_mobilenet", "digits_resnet", "mobilenet_v2", "resnet18", "resnet50",
           "searchable_mobilenet_v2", "small_cnn", "vit"]
