// Networks tab: one delegated listener on the component root, which survives re-renders.
// A chip adds its word; the "i" button only selects; anywhere else on a card toggles its tag.
element.addEventListener('click', (event) => {
  const chip = event.target.closest('[data-word]');
  const holder = event.target.closest('[data-lora]');
  const name = holder ? holder.dataset.lora : '';
  if (chip) {
    event.stopPropagation();
    trigger('click', { kind: 'word', word: chip.dataset.word, name: name });
    return;
  }
  if (event.target.closest('[data-info]')) {
    event.stopPropagation();
    trigger('click', { kind: 'info', name: name });
    return;
  }
  if (holder && holder.classList.contains('lw-card')) {
    trigger('click', { kind: 'card', name: name });
  }
});
element.addEventListener('keydown', (event) => {
  const card = event.target.closest('.lw-card');
  if (card && (event.key === 'Enter' || event.key === ' ')) {
    event.preventDefault();
    trigger('click', { kind: 'card', name: card.dataset.lora });
  }
});
