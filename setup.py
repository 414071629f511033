"""Installs the dopy package and the dopyserver and dopyclient scripts."""

from setuptools import setup

setup(
    name='dopy',
    version='1.0.0',
    description='DOPY, Distributed Objects for Python: call objects in another process',
    long_description=open('README.html', encoding='utf-8').read(),
    long_description_content_type='text/html',
    license='MIT',
    packages=['dopy'],
    scripts=['dopyserver', 'dopyclient'],
    python_requires='>=3.10',
    classifiers=[
        'License :: OSI Approved :: MIT License',
        'Programming Language :: Python :: 3',
        'Topic :: System :: Distributed Computing',
    ],
)
