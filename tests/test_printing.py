import torch

from transfusion_pytorch import print_modality_sample


def test_print_modality_sample_describes_each_form(capsys):
    # Int[b n] text rows: one line per row (it used to say "text: 2 tokens" for two rows)
    print_modality_sample(torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]))
    assert capsys.readouterr().out.splitlines() == ['text row 0: 5 tokens [1, 2, 3, 4, 5]', 'text row 1: 5 tokens [6, 7, 8, 9, 10]']

    print_modality_sample([torch.arange(14), (1, torch.zeros(2, 3, 4)), torch.zeros(5, 6), torch.ones(2, 2, dtype = torch.long)])
    assert capsys.readouterr().out.splitlines() == [
        "text: 14 tokens [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, '...']",
        'modality 1: shape (2, 3, 4)',
        'modality 0: shape (5, 6)',
        'text?: an integer tensor of shape (2, 2) (text in a sample is 1-d)',
    ]
    print_modality_sample(torch.tensor([4, 5]))
    assert capsys.readouterr().out == 'text: 2 tokens [4, 5]\n'
