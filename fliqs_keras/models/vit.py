"""A small DeiT/ViT as a plain Keras Functional model.

A patch embedding (a convolution with stride = patch size), a learned class
token and position embedding, pre-norm transformer blocks of
`MultiHeadAttention` and a GELU MLP, and a classifier on the class token. The
default size is DeiT-Tiny (width 192, depth 12, 3 heads, patch 16).
"""

from __future__ import annotations

import keras


@keras.saving.register_keras_serializable(package="fliqs_keras")
class ClassTokenAndPosition(keras.layers.Layer):
    """Prepends a learned class token to the patch tokens and adds a learned position embedding."""

    def build(self, input_shape):
        tokens, width = input_shape[1], input_shape[2]
        self.class_token = self.add_weight(name="class_token", shape=(1, 1, width), initializer="zeros")
        self.position = self.add_weight(name="position", shape=(1, tokens + 1, width),
                                        initializer=keras.initializers.TruncatedNormal(stddev=0.02))

    def call(self, inputs):
        batch = keras.ops.shape(inputs)[0]
        token = keras.ops.broadcast_to(keras.ops.cast(self.class_token, inputs.dtype),
                                       (batch, 1, keras.ops.shape(inputs)[2]))
        return keras.ops.concatenate([token, inputs], axis=1) + keras.ops.cast(self.position, inputs.dtype)

    def compute_output_shape(self, input_shape):
        tokens = None if input_shape[1] is None else input_shape[1] + 1
        return (input_shape[0], tokens, input_shape[2])


def vit(input_shape=(224, 224, 3), classes: int = 1000, patch: int = 16, width: int = 192, depth: int = 12,
        heads: int = 3, mlp_ratio: int = 4) -> keras.Model:
    """A ViT; the classifier outputs logits."""
    if input_shape[0] % patch or input_shape[1] % patch:
        raise ValueError(f"Image size {input_shape[:2]} is not a multiple of the patch size {patch}.")
    if width % heads:
        raise ValueError(f"width {width} is not a multiple of heads {heads}.")
    inputs = keras.Input(input_shape, name="image")
    x = keras.layers.Conv2D(width, patch, patch, name="patch_embedding")(inputs)
    x = keras.layers.Reshape((-1, width), name="tokens")(x)
    x = ClassTokenAndPosition(name="class_token_and_position")(x)
    for index in range(depth):
        name = f"block{index}"
        y = keras.layers.LayerNormalization(epsilon=1e-6, name=f"{name}_norm1")(x)
        y = keras.layers.MultiHeadAttention(heads, width // heads, name=f"{name}_attention")(y, y)
        x = keras.layers.Add(name=f"{name}_add1")([x, y])
        y = keras.layers.LayerNormalization(epsilon=1e-6, name=f"{name}_norm2")(x)
        y = keras.layers.Dense(width * mlp_ratio, activation="gelu", name=f"{name}_mlp1")(y)
        y = keras.layers.Dense(width, name=f"{name}_mlp2")(y)
        x = keras.layers.Add(name=f"{name}_add2")([x, y])
    x = keras.layers.LayerNormalization(epsilon=1e-6, name="norm")(x)
    # The class token: crop the sequence to its first slot (no Lambda, so the model serialises).
    x = keras.layers.Cropping1D((0, x.shape[1] - 1), name="class_slot")(x)
    x = keras.layers.Flatten(name="class_output")(x)
    return keras.Model(inputs, keras.layers.Dense(classes, name="logits")(x), name="vit")
