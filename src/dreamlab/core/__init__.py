"""The mathematics of diffusion sampling. Imports only torch; knows nothing about models or prompts.

Notation used throughout (Karras et al. 2022, "EDM"; k-diffusion):
    x      = x0 + sigma * eps          the sampler's state, "variance exploding" form
    x_t    = x / sqrt(1 + sigma**2)    the same point in the DDPM ("variance preserving") form
    sigma  = sqrt((1 - alpha_bar_t) / alpha_bar_t)  for a discrete-time model trained at step t
Sigma is the only time unit inside the sampling loop; integer timesteps exist only inside
:class:`dreamlab.core.prediction.Denoiser`, the adapter of a discrete-time model.
"""
