"""Reference models, plain Keras 3 Functional models usable with or without `fliqs_keras.apply`.

    from fliqs_keras import models
    models.resnet18((32, 32, 3), classes=10, stem="cifar", width=0.5)
    models.resnet50()                       # the stride in the 3x3 convolution, as the FLIQS paper counts
    models.mobilenet_v2((28, 28, 1), classes=10, width=0.5, small_input=True)
    models.vit((32, 32, 3), classes=10, patch=4, width=64, depth=4, heads=4)
    models.digits_resnet()                  # the Pareto benchmark's models for 28x28 digits
    models.digits_mobilenet()

All classify with logits (no softmax).
"""

from fliqs_keras.models.digits import digits_mobilenet, digits_resnet, small_cnn
from fliqs_keras.models.mobilenet_v2 import mobilenet_v2
from fliqs_keras.models.resnet import resnet18, resnet50
from fliqs_keras.models.vit import ClassTokenAndPosition, vit

__all__ = ["ClassTokenAndPosition", "digits_mobilenet", "digits_resnet", "mobilenet_v2", "resnet18", "resnet50",
           "small_cnn", "vit"]
