"""Pure loss functions (ITA, PCMA, CCE, MGCA's CTA/CPA) and cross-replica gathering."""
