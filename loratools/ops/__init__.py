"""Operations on adapters: pure functions over Adapter objects and tensors."""
