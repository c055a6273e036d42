"""The data extra is optional: the package, the data modules and the command line import
without Pillow, diffusers, transformers, datasets, webdataset or matplotlib (each is imported
where it is used)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


BLOCKED = '''
import sys
class Block:
    def find_spec(self, name, path = None, target = None):
        if name.split('.')[0] in {'PIL', 'diffusers', 'transformers', 'datasets', 'webdataset', 'pyarrow', 'tokenizers', 'matplotlib'}:
            raise ImportError(f'{name} is blocked')
sys.meta_path.insert(0, Block())
import transfusion_pytorch, transfusion_pytorch.data.loader, transfusion_pytorch.data.prepare, transfusion_pytorch.jobs.image_text
from transfusion_pytorch import cli
cli.build_parser().format_help()
print('imported')
'''


def test_the_package_and_its_commands_import_without_the_data_extra():
    env = dict(os.environ, PYTHONPATH = os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]))
    result = subprocess.run([sys.executable, '-c', BLOCKED], env = env, capture_output = True, text = True, timeout = 120)
    assert result.returncode == 0 and 'imported' in result.stdout, result.stderr[-2000:]
