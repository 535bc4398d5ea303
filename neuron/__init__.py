"""Trainium entrypoint: MambaLMHeadModel under neuronx-distributed (TP, ZeRO-1, bf16).

Never imports Composer."""
