"""The optimizer configurations the first-step benchmarks compare, by
name: Keras's Adam, Keras's accumulation and ours (first_step.py,
real_models.py); and the "gate off" diagnosis they and fit_k1.py share."""


def ungate_updates():
    """Diagnosis only: the rule's writes no longer wait for the finite
    check (which is still computed and counted), so a non-finite gradient
    would be applied. Patches ours in this process; models compiled while
    the patch holds keep it.

    Returns:
        A function that undoes the patch.
    """
    import dataclasses

    from keras_gradtools.optimizers import base

    apply_rule = base.GradientPipelineOptimizer._apply_rule

    def apply_rule_ungated(self, update):
        apply_rule(self, dataclasses.replace(update, gate=None))

    base.GradientPipelineOptimizer._apply_rule = apply_rule_ungated

    def restore():
        base.GradientPipelineOptimizer._apply_rule = apply_rule

    return restore


def adam_optimizer(configuration, noise_eta=1e-3):
    """Returns a fresh optimizer for `configuration`.

    Args:
        configuration: `"keras adam"`, `"keras accumulation K=4"`, `"ours
            K=4 macro"`, `"ours K=4 micro"`, `"ours K=4
            clip+noise+statistics"`, `"ours K=1 on_nonfinite=apply"`, or
            another name starting with `"ours K=1"` (ours at K = 1, as
            first_step.py's diagnoses patch it).
        noise_eta: The noise of the clip+noise+statistics configuration.

    Returns:
        A Keras optimizer.
    """
    import keras

    import keras_gradtools as kg

    if configuration == "keras adam":
        return keras.optimizers.Adam(1e-3)
    if configuration == "keras accumulation K=4":
        return keras.optimizers.Adam(1e-3, gradient_accumulation_steps=4)
    if configuration == "ours K=1 on_nonfinite=apply":
        return kg.Adam(1e-3, on_nonfinite="apply")
    if configuration == "ours K=4 macro":
        return kg.Adam(1e-3, accumulation_steps=4)
    if configuration == "ours K=4 micro":
        return kg.Adam(1e-3, accumulation_steps=4, second_moment="micro")
    if configuration == "ours K=4 clip+noise+statistics":
        return kg.Adam(
            1e-3,
            accumulation_steps=4,
            global_clipnorm=1.0,
            noise_eta=noise_eta,
            track_gradient_statistics=True,
        )
    if configuration.startswith("ours K=1"):
        return kg.Adam(1e-3)
    raise ValueError(f"unknown configuration {configuration!r}")
