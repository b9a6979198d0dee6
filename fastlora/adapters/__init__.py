"""Multi-adapter data: adapters packed for one launch (``packed``), the bank of resident
adapters of a layer or model (``bank``) and each row's adapter in a batch (``routing``)."""
